"""samlab: sharpness-aware minimization and the m-sharpness phenomenon, as a library and a dashboard."""

__version__ = "0.1.0"
