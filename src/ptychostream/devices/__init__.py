"""The two IOCs' devices: the reconstructor and the simulated detector, wired from the stages."""
