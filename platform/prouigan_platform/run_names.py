"""The names the platform writes into MLflow, defined once: the tags of runs and of model versions, and the names
of a training's validation metrics.  Every writer and reader uses these; a string literal elsewhere is a name that
drifts apart from its reader."""

from prouigan.vocabulary import VALIDATION_METRICS

# every run (tracking.open_run)
PIPELINE = "pipeline"  # train, tune, tune-trial, retrain, hello
GIT = "git_commit"
CONFIG_DIGEST = "config_digest"
DATASET = "data_manifest"  # the manifest URI of the dataset version the run read
DATASET_DIGEST = "data_manifest_digest"
ERROR = "error"
STOPPED = "stopped"  # why a KILLED run was stopped
# a training run (training/driver.py)
TRAIN_NAME = "train_name"  # a training's name: a re-run of the name re-opens its run
BEST_CHECKPOINT = "best_checkpoint"
LATEST_CHECKPOINT = "latest_checkpoint"
REGISTERED_CHECKPOINT = "registered_checkpoint"  # the checkpoint registered last (a re-run registers nothing new)
REGISTERED_VERSION = "registered_version"  # models:/NAME/N
# a retrain run (retraining.py)
CANDIDATE = "candidate"  # the version it trained and gated
FAILED_STEP = "failed_step"  # shard, train or evaluate
GATE_DECISION = "gate.decision"  # also on the candidate version (gate.record), with gate.reason and the numbers
GATE_REASON = "gate.reason"
# a search (search.py)
TUNE_TRIAL = "tune_trial"
TUNE_STUDY = "tune_study"
STOPPED_EARLY = "stopped_early"  # a trial ASHA cut
# model versions
FILES_SHA256 = "prouigan.files_sha256"  # registry.py: the digest of the record of every file of the version
CHAMPION_FENCE = "prouigan.champion_fence"  # gate.py: on the registered model and on the version it moved to

# a training's validation reports: val_<metric>, and the step they were measured at
VAL = {m: f"val_{m}" for m in VALIDATION_METRICS}
VAL_STEP = "val_step"
