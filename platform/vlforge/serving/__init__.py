"""vlforge.serving: trained models packed for serving, registered in MLflow, promoted between aliases.

- ``directory``: ``prepare_serving_dir`` packs a model directory with its preprocessing
  (``preprocess.json``, ``tokenizer.json``) so it can be served offline; ``serving_kind`` and friends
  read one back;
- ``pyfunc_model``: the MLflow pyfunc ("models from code") that serves such a directory;
- ``logged_model``: what a logged model carries (pyfunc code, signature, requirements);
- ``registry``: ``log_and_register``, aliases, lookup and download by ``NAME@ALIAS``;
- ``promotion``: the gated ``challenger`` -> ``champion`` promotion and rollback.

It sits above ``vlforge.tracking`` (tracking URI, experiments, secret masking) and
``vlforge.evaluation`` (the promotion's scoring). Nothing is imported here: importing one module
(``vlforge.serving.directory``, say) does not load the others.
"""
