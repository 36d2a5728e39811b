"""One module per model family, each exporting ``SPEC``; the registry imports them all."""
