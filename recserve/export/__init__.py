"""The export stage: a Hugging Face checkpoint becomes a served model repository (`recserve export`).

Importing this package is cheap: torch, transformers and optimum are imported only by the modules that run
the export, never by `recserve.export.command.configure` nor by `parity_texts`.
"""
