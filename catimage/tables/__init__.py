"""The data every stage shares: the quality table's schema and readers (`table`), the candidate pool
and its costs (`pool`, `cost`), and the build job's pure helpers (`build`)."""
