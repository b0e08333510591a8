"""segkit's version, in a module of its own: modules that need it import it from here, not from the
`segkit` package (whose lazy `predict` would otherwise close an import cycle)."""

__version__ = "0.1.0"
