"""segkit's version, in a module of its own: modules that need it import it from here, not from the
`segkit` package (whose lazy `predict` would otherwise close an import cycle)."""

__version__ = "0.1.0"

#: The distribution's name (what `pip install` takes and bioimage.io package environments ask for); the import
#: name and the command are `segkit`. The name `segkit` on PyPI belongs to an unrelated project.
DISTRIBUTION = "segkit-bio"
