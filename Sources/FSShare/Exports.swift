// `import FSShare` brings the error type and the watcher too: they are one library to its users,
// split into modules so that each has one job.
@_exported import FSShareCore
@_exported import FSShareWatch
