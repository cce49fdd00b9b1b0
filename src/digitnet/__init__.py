"""digitnet: train, sweep and ship 28x28 image classifiers with Lightning + Hydra."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("digitnet")
except PackageNotFoundError:  # running from a source tree without installing
    __version__ = "0.0.0+local"
