from a2ats_sglang.calibration.calibrate import main

main()
