"""The parts of the command line mpidd.train (python -m mpidd.train is its entry point):

    arguments   flags, config files, resume's options (argparse)
    plan        typed configuration from the arguments; every refusal before training (rank 0)
    run         Run, the command line's methods.context.Context: checkpoints, marker, agreed stops, logs
    phases      the phases of a run, each around its method (mpidd.methods)
"""
