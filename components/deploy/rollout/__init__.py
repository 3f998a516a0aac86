"""Shadow and canary rollouts: a challenger beside the champion, promoted or rolled back on live evidence."""
