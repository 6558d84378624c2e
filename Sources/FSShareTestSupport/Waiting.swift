#if canImport(Glibc)
import Glibc
#endif
import FSShareSystem

/// Polls `condition` every 10 ms until it holds or `seconds` pass, blocking the calling thread
/// (for synchronous tests and tools).
public func waitUntil(_ seconds: Double, _ condition: () -> Bool) -> Bool {
    let deadline = Sys.monotonicNanoseconds() + UInt64(seconds * 1e9)
    while !condition() {
        if Sys.monotonicNanoseconds() > deadline { return false }
        usleep(10_000)
    }
    return true
}

/// The same for async code: suspends between polls, so no thread of the cooperative pool is held
/// (a blocking poll in an async test once kept a ServiceGroup task waiting 10 s in CI).
public func eventually(_ seconds: Double, _ condition: () -> Bool) async -> Bool {
    let deadline = ContinuousClock.now + .milliseconds(Int(seconds * 1000))
    while !condition() {
        if ContinuousClock.now > deadline { return false }
        try? await Task.sleep(for: .milliseconds(10))
    }
    return true
}
