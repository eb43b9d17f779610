"""The methods of mpidd, each a module that reads top to bottom as its data flow:

    twolevel    local CNNs on their subimages, gather of their probabilities, coarse DNN
    coherent    the CNN-DNN as one model parallel model, from random or pre-trained local CNNs
    width       Gu et al.: thin sub-networks along the channels, recomposed into the global CNN
    global_cnn  the global CNN on whole images (rank 0 alone, or data parallel over the ranks)
    context     the Context every method receives (no MPI of its own)

They take numpy arrays, typed configuration and a `Context` (communicator, device, this
rank's subdomains, and three small interfaces: Stops, Checkpoints, Progress). The public API
(mpidd.api) and the command line (mpidd.train) both call them, each providing those
interfaces: the API's do nothing (but print progress when verbose), the command line's agree
stops across the ranks, save and resume through the run directory, and log.
"""
