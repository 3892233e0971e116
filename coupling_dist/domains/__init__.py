"""Domains: what a sample is (text tokens, binary pixels, nucleotides) and everything about it
that differs between them (``base.Domain``); ``build_domain(cfg)`` picks one by ``data.domain``."""
from .base import Domain, build_domain

__all__ = ["Domain", "build_domain"]
