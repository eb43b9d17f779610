"""The methods of mpidd, each a module that reads top to bottom as its data flow:

    twolevel   local CNNs on their subimages, gather of their probabilities, coarse DNN

They take numpy arrays, typed configuration and a `Context` (communicator, device, this
rank's subdomains, and the hooks through which the command line adds checkpoints, stops and
progress). The public API (mpidd.api) and the command line (mpidd.train) both call them.
"""
