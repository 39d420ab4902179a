"""Run experiments and pipelines on a running Ray cluster as Ray Jobs, and look after those jobs.

``gpt2exp submit SPEC --address http://HEAD:8265`` does, on the client:

1. validates the spec with its ``--set`` overrides (and ``parallel.launcher=ray``), as ``gpt2exp run`` would
   (:mod:`.package`);
2. reaches the cluster's dashboard, sending the cluster's token when it wants one; a wrong address fails within
   seconds, a head that is still starting is waited for up to a minute (:mod:`.connection`);
3. asks the cluster for its alive nodes and checks the rules it puts on an experiment: the workers fit, and on
   several nodes the output folder, the token cache and the MLflow store are reachable from every node
   (:mod:`.rules`);
4. packs the project folder (ignore files honoured, secrets always left out) with the *effective* spec at
   ``.gpt2exp-submit/<submission id>.yaml``, so the job runs exactly what was validated here (:mod:`.package`);
5. submits ``python -m gpt2exp.cli run .gpt2exp-submit/<id>.yaml --launcher ray --output OUT --no-progress``
   with that zip as ``working_dir`` and the environment the job needs, under the id
   ``gpt2exp-<spec name>-<UTC time>`` (:mod:`.submit`).

``gpt2exp pipeline submit PIPELINE`` does the same for a whole pipeline (made self-contained) and runs
``gpt2exp pipeline run`` in the job. ``--dry-run`` stops before step 2, contacting no one. The ``gpt2exp jobs``
commands (list, status, logs, stop) and ``--follow`` are :mod:`.follow`.

Inside the job Ray sets ``RAY_ADDRESS``, so the driver joins the cluster instead of starting one. On several
nodes the entrypoint is ``python -m gpt2exp.jobs.checked_run OUT ...``, which first checks in the job that every
node sees the output folder (:mod:`.checked_run`).

Every failure is a ``Gpt2expError`` for the CLI to print: a ``SubmitError`` (a one-line message and an exit
code), or a bad spec's ``SpecError``."""
