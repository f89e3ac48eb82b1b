"""Every file and directory name the package writes or reads, defined once.

A user keeps these files (factor directories, sweep and run directories, edited model directories), so the names
never change; code refers to them only through these constants.
"""

# Factor directories (kfac_edit.factors.store) and collection checkpoints (kfac_edit.factors.checkpoint)
TENSORS_FILE = "factors.safetensors"  # factor sums and counts
MANIFEST_FILE = "manifest.json"  # how the factors were collected
CHECKPOINT_DIR = "checkpoint"  # collection checkpoints, inside the factor directory being written
STATE_FILE = "state.json"  # a checkpoint's progress
EKFAC_FILE = "ekfac.safetensors"  # EK-FAC pair sums in the factors' eigenbasis (kfac_edit.factors.ekfac)

# Edited model directories (kfac_edit.edit)
EDIT_REPORT_FILE = "edit_report.json"  # beside save_pretrained's files

# Sweep directories (kfac_edit.sweep, kfac_edit.pareto) and the report (kfac_edit.report)
RESULTS_FILE = "results.jsonl"  # one record per sweep point
SWEEP_FILE = "sweep.json"  # the sweep's settings and identity (resume check, ppl budget)
BEST_FILE = "best.json"  # layers JSON of the chosen point
SPECTRA_FILE = "spectra.json"  # eigenvalue spectra of the chosen point's modules
BEFORE_AFTER_FILE = "before_after.json"  # headline metrics before / after, what `kfac-edit report` shows
HTML_FILE = "report.html"
MARKDOWN_FILE = "report.md"
PLOTS_DIR = "plots"
RECORDS_FILE = "records.jsonl"  # per memorized record: base and edited continuations of the reported point
PROVENANCE_FILE = "provenance.json"  # model, factors, memorized sets, times and versions behind a report
SPLIT_DIR = "split"  # the selection / held-out parts of the memorized records, as the sweep used them

# Run directories (kfac_edit.workflow, `kfac-edit run`)
EDITED_DIR = "edited"  # the edited model
EVALS_FILE = "evals.jsonl"  # full evaluation records, base then edited
RUNS_FILE = "runs.jsonl"  # one summary line per run

# lm-eval output (kfac_edit.lm_eval_tasks)
LM_EVAL_RESULTS_FILE = "lm_eval_results.json"
LM_EVAL_SAMPLES_FILE = "lm_eval_samples.jsonl"

# Testbed directories (kfac_edit.testbed)
TESTBED_INFO_FILE = "testbed.json"
CORPUS_FILE = "corpus.jsonl"
MEMORIZED_FILE = "memorized.jsonl"
RULE_HELDOUT_FILE = "rule_heldout.jsonl"
CLEAN_FILE = "clean.jsonl"

# Cache: $KFAC_EDIT_CACHE (default ~/.cache/kfac-edit) and its sub-directories (kfac_edit.fileio.cache_root)
CACHE_ENV = "KFAC_EDIT_CACHE"
EIGEN_CACHE = "eigen"  # eigendecompositions (kfac_edit.eigen)
NDCG_CACHE = "ndcg"  # reference top-k (kfac_edit.evaluate.ndcg)
TESTBED_CACHE = "testbed"  # built testbeds (kfac_edit.testbed)

# Demo directories (kfac_edit.demo)
DEMO_RESULTS_FILE = "results.json"  # configuration, every point, the comparison, checks, timings
TABLE_FILE = "table.txt"  # the console table
SUMMARY_FILE = "summary.json"  # the headline in machine-readable form
