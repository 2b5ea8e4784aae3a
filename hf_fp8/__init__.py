"""hf_fp8"""
