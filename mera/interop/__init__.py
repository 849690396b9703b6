"""Taking models into and out of mera runs.

- :mod:`mera.interop.llava`: ``import_llava``, a transformers LLaVA checkpoint split into an LLM,
  a CLIP encoder and a pretrained image connector a run config can use (``mera import-llava``);
- :mod:`mera.interop.export`: ``export_stage``, a finished stage written as a self-contained model,
  ``load_exported`` to load it back, and ``assets_for`` / ``find_run_dir`` / ``check_stage`` to use
  the stages of a finished run (``mera export``);
- :mod:`mera.interop.llava_export`: ``export_llava``, a stage written as a transformers
  ``LlavaForConditionalGeneration`` folder (``mera export --format llava``), and
  ``load_llava_parts``, such a folder split back into mera's LLM, CLIP encoder and connector;
- :mod:`mera.interop.generate`: ``load_target`` and ``answer`` / ``answer_batch``, prompts answered by
  a finished stage or an exported model (``mera generate``).

The command-line side of each lives in :mod:`mera.cli`. Nothing heavy (torch, transformers) is
imported until a function needs it.
"""
