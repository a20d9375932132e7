"""Stage 1: exams manifest, DICOM and NLST inputs, nodule tracking table, split tables, the synthetic cohort."""
