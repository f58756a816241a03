package kms

import (
	"encoding/json"
	"fmt"
	"strings"
	"testing"
)

func TestSecretNeverPrints(t *testing.T) {
	s := NewSecret([]byte("TOPSECRET"))
	for _, f := range []string{"%v", "%+v", "%#v", "%s", "%x", "%X", "%q", "%d"} {
		if out := fmt.Sprintf(f, s); strings.Contains(out, "TOPSECRET") || strings.Contains(strings.ToLower(out), "544f50") {
			t.Errorf("%s printed %q", f, out)
		}
	}
	wrapped := struct{ S Secret }{s}
	if out := fmt.Sprintf("%+v", wrapped); strings.Contains(out, "TOPSECRET") {
		t.Errorf("a struct holding a secret printed %q", out)
	}
	if _, err := json.Marshal(wrapped); err == nil {
		t.Error("json.Marshal of a secret succeeded")
	}
	if !s.Equal(NewSecret([]byte("TOPSECRET"))) || s.Equal(NewSecret([]byte("TOPSECRE7"))) {
		t.Error("Equal is wrong")
	}
	s.Wipe()
	if string(s.Reveal()) != strings.Repeat("\x00", 9) {
		t.Error("Wipe left material")
	}
}
