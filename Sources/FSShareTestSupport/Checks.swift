/// Collects check results; a scenario fails if any check failed.
public final class Checks {
    /// Prints the summary line the test harness looks for (`N checks passed, M failed`).
    public func summary() {
        print("\(passed) checks passed, \(failures) failed")
    }

    public init() {}

    public private(set) var failures = 0
    public private(set) var passed = 0

    public func check(_ condition: Bool, _ what: @autoclosure () -> String) {
        if condition {
            passed += 1
            print("ok: \(what())")
        } else {
            failures += 1
            print("FAIL: \(what())")
        }
    }

    public func must<T>(_ what: String, _ body: () throws -> T) -> T? {
        do {
            let value = try body()
            passed += 1
            print("ok: \(what)")
            return value
        } catch {
            failures += 1
            print("FAIL: \(what): \(error)")
            return nil
        }
    }

    /// Expects `body` to throw; returns the error.
    @discardableResult
    public func mustFail(_ what: String, _ body: () throws -> Void) -> (any Error)? {
        do {
            try body()
            failures += 1
            print("FAIL: \(what): did not fail")
            return nil
        } catch {
            passed += 1
            print("ok: \(what) (\(error))")
            return error
        }
    }
}

