"""Ray Train + DeepSpeed training: ``runner.run_training(cfg)`` on the driver, ``loop.train_fn_per_worker``
on each worker, ``engine`` (DeepSpeed config, optimizer, schedule), ``checkpoint`` (shards, resume, weights),
``export`` (fp32 safetensors); ``data_probe`` streams data only. The task modules it trains (method ->
task) come from ``vlforge.tasks``."""
