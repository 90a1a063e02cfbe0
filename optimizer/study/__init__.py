"""The Optuna study around it all. Its table of contents, in the order a study runs:

What was asked
    ``options``      ``optimize study``'s options, read and routed into one ``StudySettings``.
    ``settings``     ``StudySettings`` (one model, or several: ``models``) and ``SearchSettings``.
    ``models_file``  the models file (``--models``) and ``--model`` given twice: each model's entry.
    ``targets``      the ``--target`` server built from its options.
    ``checks``       settings and a stored study's space checked before any work.

The one driver
    ``run``          ``run_study``: picks the workload, hands it to the driver; ``cross_check_study``.
    ``driver``       ``drive``: storage, create-or-join, sampler, workers, pinning, the server's lifecycle,
                     the default latency budget, the trial loop; the same steps for every workload.
    ``storage``      the study database: storages, workers, counting and recovering trials.

The workloads (what differs between one model and several)
    ``one_model``    ``OneModel``: intake, profile, budget, starting points, confirmation, export.
    ``trial``        one model's trial: render, hot-reload, sweep, score (``TrialRunner``).
    ``joint``        ``SeveralModels``: the models, their destinations and budgets, the joint export.
    ``joint_trial``  a joint trial: every model's config loaded together, swept under the mixed load.
    ``precisions``   the variants (fp16, int8) behind the accuracy guard, for both workloads.

After the budget
    ``confirm``      one model's finalists re-measured side by side; the pick.
    ``crosscheck``   the baseline and the best measured by perf_analyzer too.
    ``results``      what the database holds, read back: summaries, the best trial, exports.
    ``progress``     what the user sees: the progress bar and the final table.
"""
