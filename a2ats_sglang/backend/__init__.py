"""The ``a2ats`` SGLang attention backend."""
