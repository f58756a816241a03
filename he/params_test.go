package he

import (
	"encoding/json"
	"errors"
	"fmt"
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
		{CKKS, `{"LogN":12,"LogQ":[40],"LogP":[40],"LogDefaultScale":30}`, "params.LogN: 12 is outside 13..16"},
		{CKKS, `{"LogN":14,"Bogus":1}`, "params.Bogus: field not accepted"},
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

// TestWeakLiteralsRefused: literals whose secret key an attacker recovers
// from the public key (a sparse or low-density secret, a near-zero error)
// and every field or value the security check does not understand are
// refused, naming the field. Before the allow-list, the first three were
// accepted.
func TestWeakLiteralsRefused(t *testing.T) {
	const base = `"LogN":13,"LogQ":[45,35],"LogP":[45],"LogDefaultScale":35`
	const bgvBase = `"LogN":13,"LogQ":[54,54],"LogP":[55],"PlaintextModulus":65537`
	cases := []struct {
		s     Scheme
		extra string
		want  string
	}{
		// The review's three.
		{CKKS, `"Xs":{"Type":"Ternary","H":1}`, "params.Xs.H"},
		{CKKS, `"Xs":{"Type":"Ternary","P":0.001}`, "params.Xs.P"},
		{CKKS, `"Xe":{"Type":"DiscreteGaussian","Sigma":0.05,"Bound":1}`, "params.Xe.Sigma"},
		// Secrets.
		{CKKS, `"Xs":{"Type":"Ternary","H":4096}`, "params.Xs.H"},
		{CKKS, `"Xs":{"Type":"Ternary","H":8192}`, "params.Xs.H"},
		{CKKS, `"Xs":{"Type":"Ternary","P":0.5}`, "params.Xs.P"},
		{CKKS, `"Xs":{"Type":"Ternary","P":0.667}`, "params.Xs.P"},
		{CKKS, `"Xs":{"Type":"Ternary","P":1}`, "params.Xs.P"},
		{CKKS, `"Xs":{"Type":"Ternary","P":0.6666666666666666,"H":0,"Extra":1}`, "params.Xs.Extra"},
		{CKKS, `"Xs":{"Type":"Ternary","p":0.6666666666666666}`, "params.Xs.p"},
		{CKKS, `"Xs":{"Type":"DiscreteGaussian","Sigma":3.2,"Bound":19.2}`, "params.Xs: a DiscreteGaussian secret"},
		{CKKS, `"Xs":{"Type":"Uniform"}`, "params.Xs.Type"},
		{CKKS, `"Xs":{"Type":"Binary"}`, "params.Xs.Type"},
		{CKKS, `"Xs":{"P":0.5}`, "params.Xs.Type"},
		{CKKS, `"Xs":"Ternary"`, "params.Xs"},
		{BGV, `"Xs":{"Type":"Ternary","H":64}`, "params.Xs.H"},
		// Errors.
		{CKKS, `"Xe":{"Type":"DiscreteGaussian","Sigma":3.18,"Bound":19.08}`, "params.Xe.Sigma"},
		{CKKS, `"Xe":{"Type":"DiscreteGaussian","Sigma":0,"Bound":0}`, "params.Xe.Sigma"},
		{CKKS, `"Xe":{"Type":"DiscreteGaussian","Sigma":-3.2,"Bound":19.2}`, "params.Xe.Sigma"},
		{CKKS, `"Xe":{"Type":"DiscreteGaussian","Sigma":1e300,"Bound":1e301}`, "params.Xe.Sigma"},
		{CKKS, `"Xe":{"Type":"DiscreteGaussian","Sigma":3.2,"Bound":19.1}`, "params.Xe.Bound"},
		{CKKS, `"Xe":{"Type":"DiscreteGaussian","Sigma":3.2,"Bound":1}`, "params.Xe.Bound"},
		{CKKS, `"Xe":{"Type":"DiscreteGaussian","Sigma":3.2,"Bound":1e9}`, "params.Xe.Bound"},
		{CKKS, `"Xe":{"Type":"DiscreteGaussian","Sigma":3.2}`, "no value for Bound"},
		{CKKS, `"Xe":{"Type":"Ternary","P":0.6666666666666666}`, "params.Xe: a Ternary error"},
		{CKKS, `"Xe":{"Type":"Uniform"}`, "params.Xe.Type"},
		{CKKS, `"Xe":{"Type":"DiscreteGaussian","Sigma":3.2,"Bound":19.2,"Mean":5}`, "params.Xe.Mean"},
		{BGV, `"Xe":{"Type":"DiscreteGaussian","Sigma":1,"Bound":6}`, "params.Xe.Sigma"},
		// Rings and unknown fields.
		{CKKS, `"RingType":"ConjugateInvariant"`, "params.RingType"},
		{CKKS, `"LogNthRoot":15`, "params.LogNthRoot"},
		{CKKS, `"Pow2Base":10`, "params.Pow2Base"},
		{CKKS, `"NTTFlag":true`, "params.NTTFlag"},
		{CKKS, `"DefaultScale":1`, "params.DefaultScale"},
		{CKKS, `"logn":14`, "params.logn"},
		{BGV, `"LogDefaultScale":30`, "params.LogDefaultScale"},
		{BGV, `"RingType":"Standard"`, "params.RingType"},
	}
	for _, c := range cases {
		b := base
		if c.s == BGV {
			b = bgvBase
		}
		spec := "{" + b + "," + c.extra + "}"
		_, err := Resolve(c.s, json.RawMessage(spec))
		var pe *ErrParams
		if !errors.As(err, &pe) || !strings.Contains(err.Error(), c.want) {
			t.Errorf("Resolve(%s, %s) = %v, want an error naming %q", c.s, spec, err, c.want)
		}
	}
	for _, logN := range []int{0, 1, 10, 12, 17, 30, -1} {
		spec := fmt.Sprintf(`{"LogN":%d,"LogQ":[45,35],"LogP":[45],"LogDefaultScale":35}`, logN)
		if _, err := Resolve(CKKS, json.RawMessage(spec)); err == nil || !strings.Contains(err.Error(), "params.LogN") {
			t.Errorf("LogN %d: %v", logN, err)
		}
	}
}

// TestSafeLiteralsAccepted: what the tables cover stays accepted, spelled
// out or left to Lattigo's defaults, and the id tells apart every field
// that affects security.
func TestSafeLiteralsAccepted(t *testing.T) {
	ids := map[string]string{}
	for _, spec := range []string{
		`{"LogN":13,"LogQ":[45,35],"LogP":[45],"LogDefaultScale":35}`,
		`{"LogN":13,"LogQ":[45,35],"LogP":[45],"LogDefaultScale":35,"Xs":{"Type":"Ternary","P":0.6666666666666666},"Xe":{"Type":"DiscreteGaussian","Sigma":3.2,"Bound":19.2}}`,
		`{"LogN":13,"LogQ":[45,35],"LogP":[45],"LogDefaultScale":35,"RingType":"Standard","LogNthRoot":14}`,
		`{"LogN":13,"LogQ":[45,35],"LogP":[45],"LogDefaultScale":35,"Xe":{"Type":"DiscreteGaussian","Sigma":3.19,"Bound":19.14}}`,
		`{"LogN":13,"LogQ":[45,35],"LogP":[45],"LogDefaultScale":35,"Xe":{"Type":"DiscreteGaussian","Sigma":8,"Bound":64}}`,
	} {
		p, err := Resolve(CKKS, json.RawMessage(spec))
		if err != nil {
			t.Fatalf("%s: %v", spec, err)
		}
		ids[spec] = p.ID
	}
	distinct := map[string]bool{}
	for _, id := range ids {
		distinct[id] = true
	}
	// The first three are the same parameters; sigma 3.19 and 8 differ.
	if len(distinct) != 3 {
		t.Fatalf("%d distinct ids, want 3: %v", len(distinct), ids)
	}
}
