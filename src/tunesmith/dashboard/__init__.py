"""`tunesmith dashboard`: a local web page of runs, their curves and evaluations."""
