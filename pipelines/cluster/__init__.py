"""The pipeline on a Kubeflow Pipelines cluster, through ``kfp.Client`` (API v2beta1).

* ``connection``: where the API is and how to authenticate (``--host``, tokens, the kubeconfig
  route through the Kubernetes API server), and ``ClusterError``, whose message says what to do;
* ``runs``: compile, upload (or a new version), submit, wait (``mlops submit``, retrain on drift);
* ``schedules``: recurring runs and their cron expressions (``mlops schedule``).
"""
