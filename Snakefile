# sslpipe: self-supervised pretraining, evaluated and compared. See README.md.
# Stages: prepare -> augment -> pretrain -> linear_eval -> report, one .smk each.
#
# No `configfile:` here: the default profile (profiles/default -> workflow/profiles/default)
# gives `--configfile config/config.yaml`, and a --configfile on the command line replaces it,
# so every config file means the same alone and layered (see workflow/rules/common.smk).


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/augment.smk"
include: "workflow/rules/pretrain.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/report.smk"


# The report and every pretraining output: an encoder that went missing (say, after a failed
# `--forcerun pretrain`) is a missing target, so the next run redoes (and resumes) its job
# instead of finding the report up to date.
rule all:
    input:
        report_outputs(),
        expand(rules.pretrain.output, name=NAME, method=METHODS, seed=SEEDS),
    default_target: True
