"""Ray Train + DeepSpeed training: ``runner.run_training(cfg)`` on the driver, ``loop.train_fn_per_worker``
on each worker, ``engine`` (DeepSpeed config, optimizer, schedule), ``tasks`` (method -> task module),
``checkpoint`` (shards, resume, weights), ``export`` (fp32 safetensors); ``data_probe`` streams data only."""
