"""CMFN: the two-stem ResNet with HCE, MFA and MBUE (and its two-stem baseline) and their blocks."""
