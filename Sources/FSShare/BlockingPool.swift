#if canImport(Glibc)
import Glibc
#endif
import FSShareCore
import FSShareSystem
import Synchronization

/// The library's own threads for blocking work: `flock` (which waits for another process
/// holding the sandbox), mounts, and copy mode's streamed copies. The `async` API runs its
/// synchronous bodies here and suspends the calling task meanwhile, so no cooperative thread of
/// the runtime's Swift concurrency pool (two on a 2-core node) ever blocks in the kernel.
///
/// Bounded: at most `maxThreads` threads, started when work is waiting and no thread is idle;
/// they stay for the life of the process (idle ones cost a stack and a futex wait). Jobs run in
/// the order they were submitted.
final class BlockingPool: @unchecked Sendable {
    /// The process's pool. Eight threads: each sharer runs one operation at a time (its gate),
    /// so this bounds how many sandboxes make progress in the kernel at once, not correctness.
    static let shared = BlockingPool(maxThreads: 8)

    let maxThreads: Int
    // The queue and counters are guarded by `mutex`; `cond` wakes idle threads.
    private let mutex: UnsafeMutablePointer<pthread_mutex_t>
    private let cond: UnsafeMutablePointer<pthread_cond_t>
    private var jobs: [() -> Void] = []
    private var head = 0
    private var threads = 0
    private var idle = 0

    init(maxThreads: Int) {
        self.maxThreads = max(1, maxThreads)
        mutex = .allocate(capacity: 1)
        cond = .allocate(capacity: 1)
        pthread_mutex_init(mutex, nil)
        pthread_cond_init(cond, nil)
    }

    // The shared pool lives for the process; a test pool is dropped only once idle.
    deinit {
        pthread_cond_destroy(cond)
        pthread_mutex_destroy(mutex)
        cond.deallocate()
        mutex.deallocate()
    }

    /// Threads started so far (for tests).
    var threadCount: Int {
        pthread_mutex_lock(mutex)
        defer { pthread_mutex_unlock(mutex) }
        return threads
    }

    /// Runs `body` on a pool thread and returns its result; the calling task is suspended, not
    /// blocked. A thread that cannot be started (resource limits) leaves the job to the threads
    /// there are; with none at all it runs inline rather than never.
    func run<T: Sendable>(_ body: @escaping @Sendable () throws(FSShareError) -> T) async throws(FSShareError) -> T {
        let result: Result<T, FSShareError> = await withCheckedContinuation { continuation in
            submit {
                do throws(FSShareError) {
                    continuation.resume(returning: .success(try body()))
                } catch {
                    continuation.resume(returning: .failure(error))
                }
            }
        }
        return try result.get()
    }

    func submit(_ job: @escaping () -> Void) {
        pthread_mutex_lock(mutex)
        jobs.append(job)
        var start = false
        if idle == 0 && threads < maxThreads {
            threads += 1
            start = true
        } else {
            pthread_cond_signal(cond)
        }
        pthread_mutex_unlock(mutex)
        guard start else { return }
        do {
            _ = try OSThread { [self] in loop() }
        } catch {
            pthread_mutex_lock(mutex)
            threads -= 1
            let none = threads == 0
            pthread_mutex_unlock(mutex)
            // No thread at all would leave the job waiting forever.
            if none, let inline = next(wait: false) { inline() }
        }
    }

    /// The next job, waiting for one if `wait`.
    private func next(wait: Bool) -> (() -> Void)? {
        pthread_mutex_lock(mutex)
        defer { pthread_mutex_unlock(mutex) }
        while head == jobs.count {
            guard wait else { return nil }
            idle += 1
            pthread_cond_wait(cond, mutex)
            idle -= 1
        }
        let job = jobs[head]
        head += 1
        if head > 64 && head * 2 > jobs.count {
            jobs.removeFirst(head)
            head = 0
        }
        return job
    }

    private func loop() {
        while let job = next(wait: true) { job() }
    }
}

/// One operation at a time per sharer, awaited without holding a thread: callers queue in
/// order and are resumed one by one. This keeps one sandbox's queue of operations (all waiting
/// for its `flock`) from taking every thread of the ``BlockingPool``.
final class AsyncGate: Sendable {
    private struct State {
        var busy = false
        var waiters: [CheckedContinuation<Void, Never>] = []
    }
    private let state = Mutex(State())

    func enter() async {
        let entered = state.withLock { s -> Bool in
            if s.busy { return false }
            s.busy = true
            return true
        }
        if entered { return }
        await withCheckedContinuation { (c: CheckedContinuation<Void, Never>) in
            let now = state.withLock { s -> Bool in
                if !s.busy {
                    s.busy = true
                    return true
                }
                s.waiters.append(c)
                return false
            }
            if now { c.resume() }
        }
    }

    func leave() {
        let next = state.withLock { s -> CheckedContinuation<Void, Never>? in
            if s.waiters.isEmpty {
                s.busy = false
                return nil
            }
            return s.waiters.removeFirst()
        }
        next?.resume()
    }
}
