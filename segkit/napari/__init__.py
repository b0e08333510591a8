"""segkit's napari plugin: a dock widget that runs a model on an image layer, and a reader for segkit's outputs.

napari finds it through the `napari.manifest` entry point (napari.yaml beside this file). Nothing in segkit
imports this package: `import segkit` and the CLI stay free of napari and Qt, which only the `napari` extra
installs (`pip install -e '.[napari]'`).
"""
