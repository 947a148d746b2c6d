"""The 3D baseline family (paper §3.1; Kwon et al. 2019): losses, update schedules, stages."""
