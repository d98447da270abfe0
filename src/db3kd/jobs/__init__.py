"""The jobs: long teacher-query work in resumable shards (soft labels, synthesis, mixtures: `runner.py`) and
student training into a run directory (`students.py`). Each is called by the CLI, recipes and the demo alike."""
