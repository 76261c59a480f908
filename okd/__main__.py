"""Allow ``python -m okd`` (and ``torchrun -m okd``)."""

from okd.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
