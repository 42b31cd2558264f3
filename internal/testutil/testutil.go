// Package testutil holds helpers shared by the project's tests.
package testutil

import (
	"os"
	"testing"
)

// RequireRootEnv, when "1", turns a root-only test's skip into a failure. CI sets it.
const RequireRootEnv = "CSI_AGENT_REQUIRE_ROOT_TESTS"

// RequireRoot skips the test when not running as root, unless CI demands
// root tests, in which case the skip is a failure nobody can miss.
func RequireRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() == 0 {
		return
	}
	if os.Getenv(RequireRootEnv) == "1" {
		t.Fatalf("test needs root and %s=1 forbids skipping it", RequireRootEnv)
	}
	t.Skip("needs root")
}
