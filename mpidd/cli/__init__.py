"""The command lines: mpidd.train's parts, and mpidd.predict and mpidd.report (python -m
mpidd.train, .predict and .report are their entry points, mpidd/train.py, predict.py, report.py):

    arguments   flags, config files, resume's options (argparse)
    plan        typed configuration from the arguments; every refusal before training (rank 0);
                Plan and Work, what rank 0 settled, broadcast to every rank
    run         what the methods receive from the command line (methods.context's interfaces):
                AgreedStops, RunDirectory (checkpoints, marker), progress to the logs; and Run
    phases      the phases of a run, each around its method (mpidd.methods)
    train       mpidd.train's main: a whole run, rank by rank, and its stop
    dryrun      mpidd.train --dry-run: what a launch would do, training nothing
    predict     mpidd.predict: classify with a finished run's model file
    report      mpidd.report: tables and figures of finished runs (no MPI)
"""
