"""moecompress: make Mixture-of-Experts language models smaller and cheaper while keeping their quality."""

__version__ = "0.1.0"
