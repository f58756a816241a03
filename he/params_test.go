package he

import (
	"encoding/json"
	"errors"
	"strings"
	"testing"
)

func TestPresetsResolveUnderTheBound(t *testing.T) {
	for _, s := range []Scheme{CKKS, BGV} {
		names := Presets(s)
		if len(names) != 4 {
			t.Fatalf("%s has %d presets, want logN 13..16", s, len(names))
		}
		for _, n := range names {
			p, err := Resolve(s, json.RawMessage(`"`+n+`"`))
			if err != nil {
				t.Fatalf("%s: %v", n, err)
			}
			rp := p.RLWE()
			if lqp := rp.LogQP(); lqp > MaxLogQP[rp.LogN()] {
				t.Fatalf("%s: log2(QP) %.1f over the bound", n, lqp)
			}
			if !strings.HasPrefix(p.ID, "sha256:") || len(p.ID) != 7+64 {
				t.Fatalf("%s: id %q", n, p.ID)
			}
			again, _ := Resolve(s, json.RawMessage(`"`+n+`"`))
			if again.ID != p.ID {
				t.Fatalf("%s: id not stable", n)
			}
		}
	}
}

func TestCustomLiteralSameIDAsPreset(t *testing.T) {
	p, err := Resolve(CKKS, json.RawMessage(`"ckks-logn13"`))
	if err != nil {
		t.Fatal(err)
	}
	// The canonical JSON of the preset is itself a literal that resolves to
	// the same parameters and id.
	q, err := Resolve(CKKS, p.JSON)
	if err != nil {
		t.Fatal(err)
	}
	if q.ID != p.ID || q.Name != "custom" {
		t.Fatalf("custom literal id %s, preset %s", q.ID, p.ID)
	}
}

func TestRefusals(t *testing.T) {
	cases := []struct {
		s    Scheme
		spec string
		want string
	}{
		{CKKS, `"ckks-logn17"`, "unknown ckks preset"},
		{BGV, `"ckks-logn13"`, "unknown bgv preset"},
		{CKKS, `{"LogN":14,"LogQ":[60,60,60,60,60,60,60],"LogP":[61],"LogDefaultScale":40}`, "exceeds 438"},
		{CKKS, `{"LogN":13,"LogQ":[60,60,60,60],"LogP":[60],"LogDefaultScale":40}`, "exceeds 218"},
		{BGV, `{"LogN":15,"LogQ":[60,60,60,60,60,60,60,60,60,60,60,60,60,60,60],"LogP":[61],"PlaintextModulus":65537}`, "exceeds 881"},
		{CKKS, `{"LogN":12,"LogQ":[40],"LogP":[40],"LogDefaultScale":30}`, "outside 13..16"},
		{CKKS, `{"LogN":14,"Bogus":1}`, "neither a preset"},
		{CKKS, `{"LogN":14,"LogQ":[],"LogP":[],"LogDefaultScale":40}`, "invalid CKKS parameters"},
		{CKKS, `[1,2]`, "neither a preset"},
	}
	for _, c := range cases {
		_, err := Resolve(c.s, json.RawMessage(c.spec))
		var pe *ErrParams
		if !errors.As(err, &pe) || !strings.Contains(err.Error(), c.want) {
			t.Errorf("Resolve(%s, %s) = %v, want %q", c.s, c.spec, err, c.want)
		}
	}
}
