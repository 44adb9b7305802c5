"""tinybert: distil BERT teachers into small TinyBERT students (Jiao et al., 2020)."""

__version__ = "0.1.0"
