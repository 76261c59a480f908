"""Registered methods. Importing this package fills ``METHODS``."""

from okd.methods import baseline  # noqa: F401
from okd.methods.base import METHODS, Method, MethodContext, ParamGroup, register_method

__all__ = ["METHODS", "Method", "MethodContext", "ParamGroup", "register_method"]
