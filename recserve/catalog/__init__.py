"""Item catalogs: `recserve index` embeds items into a directory of vectors, ids, texts and attributes
(build.py, store.py); the server opens it memory-mapped and searches it (store.Catalog, search.py), exactly
or, with the `ann` extra, approximately (ann.py). Errors are in errors.py.

Importing this package is cheap: `recserve index`'s configure imports only command.py.
"""
