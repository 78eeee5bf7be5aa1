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


rule all:
    input:
        report_outputs(),
    default_target: True
