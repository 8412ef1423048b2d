"""Model loading: which families are supported, and reading a Hugging Face checkpoint's index."""
