package client_test

import (
	"os/exec"
	"strings"
	"testing"
)

// TestSDKDoesNotLinkTheService: a worker that imports the SDK (and
// kmsd-mcp, built on it) links the wire formats (kms/wire), the
// ciphertext reader (he/ciphertext) and the seeded keys' expansion
// (he/seedkey), never the service, its stores, its
// HSM code or its audit engine.
func TestSDKDoesNotLinkTheService(t *testing.T) {
	const mod = "github.com/kmsd-project/kmsd/"
	out, err := exec.Command("go", "list", "-deps", mod+"api/client", mod+"api/client/hekeys", mod+"hemcp", mod+"cmd/kmsd-mcp").Output()
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range strings.Fields(string(out)) {
		rest, ours := strings.CutPrefix(p, mod)
		if !ours {
			continue
		}
		for _, banned := range []string{"kms", "he", "store", "hsm", "audit", "internal/app"} {
			if (rest == banned || strings.HasPrefix(rest, banned+"/")) && rest != "he/ciphertext" && rest != "he/seedkey" && rest != "he/threshold" && rest != "kms/wire" {
				t.Errorf("the SDK or kmsd-mcp links %s", p)
			}
		}
	}
}
