# Bring your own data: an NLST metadata JSON becomes an exams manifest; exams given as DICOM folders become NIfTI.
# Neither runs for the synthetic demo cohort.


rule nlst_manifest:
    input:
        json=config["data"].get("nlst_json") or [],
    output:
        manifest="results/nlst/manifest.csv",
        filter_counts="results/nlst/filter_counts.csv",
        problems="results/metadata/problems/nlst.csv",
    params:
        series_filter=config["series_filter"],
    log:
        "logs/inputs/nlst_manifest.log",
    benchmark:
        "logs/benchmarks/inputs/nlst_manifest.tsv"
    conda:
        "../../envs/data.yaml"
    script:
        "../scripts/nlst_manifest.py"


rule dicom_to_nifti:
    input:
        manifest=source_manifest(),
    output:
        manifest="results/dicom/manifest.csv",
        images=directory("results/dicom/images"),
        problems="results/metadata/problems/dicom.csv",
    threads: 2
    log:
        "logs/inputs/dicom_to_nifti.log",
    benchmark:
        "logs/benchmarks/inputs/dicom_to_nifti.tsv"
    conda:
        "../../envs/data.yaml"
    script:
        "../scripts/dicom_to_nifti.py"
