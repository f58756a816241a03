// Package he holds the homomorphic-encryption key kinds (Lattigo v6 CKKS and
// BGV): the parameter registry with its security check, secret keys derived
// from a sealed seed, and evaluation-key generation that streams each key to
// a content-addressed blob store.
//
// Status: the building blocks of the HE issue. They are not yet wired into
// kms.Service or the API.
package he

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"reflect"
	"slices"
	"strings"

	"github.com/tuneinsight/lattigo/v6/core/rlwe"
	"github.com/tuneinsight/lattigo/v6/ring"
	"github.com/tuneinsight/lattigo/v6/schemes/bgv"
	"github.com/tuneinsight/lattigo/v6/schemes/ckks"
)

// Scheme is "ckks" or "bgv".
type Scheme string

const (
	CKKS Scheme = "ckks"
	BGV  Scheme = "bgv"
)

// MaxLogQP is the HomomorphicEncryption.org standard's bound on log2(QP) for
// 128-bit classical security with a uniform ternary secret and an error of
// standard deviation 3.19, by log2(N) (N = 2^16 as extended by OpenFHE's
// HEStd_128_classic table). Lattigo does not check it; Resolve does, for
// presets and custom literals alike. Ring degrees outside the table are
// refused.
var MaxLogQP = map[int]float64{13: 218, 14: 438, 15: 881, 16: 1747}

// The error distribution the security tables assume: a discrete Gaussian of
// standard deviation at least MinSigma, cut off no closer than
// MinBoundSigmas standard deviations. MaxSigma and MaxBoundSigmas keep the
// sampler's work and the noise budget sane; larger values are not weaker,
// only useless.
const (
	MinSigma       = 3.19
	MaxSigma       = 64
	MinBoundSigmas = 6
	MaxBoundSigmas = 64
)

// literalFields lists, per scheme, the fields of a Lattigo parameters
// literal that the security check understands. Anything else is refused:
// an allow-list, so a field Lattigo adds later cannot slip past.
var literalFields = map[Scheme][]string{
	CKKS: {"LogN", "LogNthRoot", "Q", "P", "LogQ", "LogP", "Xe", "Xs", "RingType", "LogDefaultScale"},
	BGV:  {"LogN", "LogNthRoot", "Q", "P", "LogQ", "LogP", "Xe", "Xs", "PlaintextModulus"},
}

// distFields lists the fields of each distribution type Lattigo parses
// (ring.ParametersFromMap ignores any others).
var distFields = map[string][]string{
	"Ternary":          {"Type", "P", "H"},
	"DiscreteGaussian": {"Type", "Sigma", "Bound"},
}

// Params is a checked parameter set.
type Params struct {
	Scheme Scheme
	Name   string // preset name, or "custom"
	CKKS   ckks.Parameters
	BGV    bgv.Parameters
	// ID is "sha256:" of the canonical JSON (Lattigo's MarshalJSON of the
	// resolved parameters: ring degree and type, moduli, secret and error
	// distributions, scale or plaintext modulus; every field that affects
	// security).
	ID string
	// JSON is that canonical JSON.
	JSON []byte
}

// RLWE returns the underlying RLWE parameters.
func (p *Params) RLWE() rlwe.Parameters {
	if p.Scheme == CKKS {
		return p.CKKS.Parameters
	}
	return p.BGV.Parameters
}

func repeat(v, n int) []int {
	out := make([]int, n)
	for i := range out {
		out[i] = v
	}
	return out
}

// presets are chosen so that log2(QP) stays under MaxLogQP with a margin.
// The CKKS presets are made for decryption with noise flooding (flood.go):
// a 55-bit scale (50 at 2^13, where the table allows no more) over a
// 58-60-bit first prime, which leaves room for messages up to 2^4-2^7 in
// magnitude, and a special modulus P at least as large as a key-switching
// digit, so key switches add little more than rounding. BENCHMARKS.md
// gives the precision each keeps after flooding.
var ckksPresets = map[string]ckks.ParametersLiteral{
	"ckks-logn13": {LogN: 13, LogQ: []int{58, 50, 50}, LogP: []int{58}, LogDefaultScale: 50},
	"ckks-logn14": {LogN: 14, LogQ: append([]int{60}, repeat(55, 4)...), LogP: []int{60, 60}, LogDefaultScale: 55},
	"ckks-logn15": {LogN: 15, LogQ: append([]int{60}, repeat(55, 11)...), LogP: []int{60, 60, 60}, LogDefaultScale: 55},
	"ckks-logn16": {LogN: 16, LogQ: append([]int{60}, repeat(55, 26)...), LogP: repeat(60, 4), LogDefaultScale: 55},
}

var bgvPresets = map[string]bgv.ParametersLiteral{
	"bgv-logn13": {LogN: 13, LogQ: []int{54, 54, 54}, LogP: []int{55}, PlaintextModulus: 65537},
	"bgv-logn14": {LogN: 14, LogQ: repeat(58, 6), LogP: []int{58}, PlaintextModulus: 65537},
	"bgv-logn15": {LogN: 15, LogQ: repeat(60, 12), LogP: []int{60, 60}, PlaintextModulus: 65537},
	"bgv-logn16": {LogN: 16, LogQ: repeat(60, 26), LogP: []int{60, 60, 60}, PlaintextModulus: 786433},
}

// Presets lists the preset names of a scheme, sorted.
func Presets(s Scheme) []string {
	var out []string
	if s == CKKS {
		for k := range ckksPresets {
			out = append(out, k)
		}
	} else {
		for k := range bgvPresets {
			out = append(out, k)
		}
	}
	slices.Sort(out)
	return out
}

// ErrParams is the error class of Resolve: the client asked for parameters
// that are unknown, malformed or below the security bound.
type ErrParams struct{ Msg string }

func (e *ErrParams) Error() string { return e.Msg }

// Resolve turns a preset name or a Lattigo ParametersLiteral (a JSON
// object, or a JSON string holding one, as kmsd sends it back) into
// checked parameters.
func Resolve(s Scheme, spec json.RawMessage) (*Params, error) {
	var name string
	if err := json.Unmarshal(spec, &name); err == nil {
		if strings.HasPrefix(strings.TrimSpace(name), "{") {
			return Resolve(s, json.RawMessage(name))
		}
		return resolvePreset(s, name)
	}
	if err := checkLiteralFields(s, spec); err != nil {
		return nil, err
	}
	switch s {
	case CKKS:
		var lit ckks.ParametersLiteral
		if err := strictUnmarshal(spec, &lit); err != nil {
			return nil, &ErrParams{"params is neither a preset name nor a CKKS parameters literal: " + err.Error()}
		}
		return build(s, "custom", lit, bgv.ParametersLiteral{})
	case BGV:
		var lit bgv.ParametersLiteral
		if err := strictUnmarshal(spec, &lit); err != nil {
			return nil, &ErrParams{"params is neither a preset name nor a BGV parameters literal: " + err.Error()}
		}
		return build(s, "custom", ckks.ParametersLiteral{}, lit)
	}
	return nil, &ErrParams{fmt.Sprintf("unknown scheme %q", s)}
}

// strictUnmarshal decodes a literal, refusing fields the literal type does
// not have (Lattigo's literals decode leniently).
func strictUnmarshal(b []byte, v any) error {
	var fields map[string]json.RawMessage
	if err := json.Unmarshal(b, &fields); err != nil {
		return errors.New("not a JSON object")
	}
	t := reflect.TypeOf(v).Elem()
	for k := range fields {
		if _, ok := t.FieldByName(k); !ok {
			return fmt.Errorf("unknown field %q", clip(k))
		}
	}
	return json.Unmarshal(b, v)
}

// checkLiteralFields refuses, naming the field, every literal field the
// security check does not understand, and every field of Xs and Xe that
// Lattigo would ignore.
func checkLiteralFields(s Scheme, spec []byte) error {
	allowed, ok := literalFields[s]
	if !ok {
		return &ErrParams{fmt.Sprintf("unknown scheme %q", s)}
	}
	var fields map[string]json.RawMessage
	if err := json.Unmarshal(spec, &fields); err != nil || fields == nil {
		return &ErrParams{"params is neither a preset name nor a parameters literal (a JSON object)"}
	}
	for k := range fields {
		if !slices.Contains(allowed, k) {
			return &ErrParams{fmt.Sprintf("params.%s: field not accepted (a literal may set %s)", clip(k), strings.Join(allowed, ", "))}
		}
	}
	for _, d := range []string{"Xs", "Xe"} {
		raw, ok := fields[d]
		if !ok {
			continue
		}
		var m map[string]json.RawMessage
		if err := json.Unmarshal(raw, &m); err != nil || m == nil {
			return &ErrParams{fmt.Sprintf("params.%s: must be an object with a Type", d)}
		}
		var typ string
		if err := json.Unmarshal(m["Type"], &typ); err != nil {
			return &ErrParams{fmt.Sprintf("params.%s.Type: must be a string", d)}
		}
		known, ok := distFields[typ]
		if !ok {
			return &ErrParams{fmt.Sprintf("params.%s.Type: distribution %q not accepted", d, clip(typ))}
		}
		for k := range m {
			if !slices.Contains(known, k) {
				return &ErrParams{fmt.Sprintf("params.%s.%s: field not accepted for a %s distribution", d, clip(k), typ)}
			}
		}
	}
	return nil
}

// checkSecurity is the allow-list the resolved parameters (Lattigo's
// defaults filled in) must pass: the ring, the secret and the error
// distributions the HomomorphicEncryption.org tables assume, and log2(QP)
// under the table's bound for the ring degree.
func checkSecurity(rp rlwe.Parameters) error {
	logN := rp.LogN()
	bound, ok := MaxLogQP[logN]
	if !ok {
		return &ErrParams{fmt.Sprintf("params.LogN: %d is outside 13..16, the ring degrees of the security table", logN)}
	}
	if rp.RingType() != ring.Standard {
		return &ErrParams{fmt.Sprintf("params.RingType: only %q is accepted (the security table covers the standard cyclotomic ring)", ring.Standard)}
	}
	if rp.NthRoot() != 2<<logN {
		return &ErrParams{fmt.Sprintf("params.LogNthRoot: only %d (2N) is accepted", logN+1)}
	}
	if err := checkDistributions(rp.Xs(), rp.Xe()); err != nil {
		return err
	}
	if lqp := rp.LogQP(); !(lqp <= bound) {
		return &ErrParams{fmt.Sprintf("params: log2(QP) = %.1f exceeds %.0f, the 128-bit security bound for N = 2^%d with a ternary secret", lqp, bound, logN)}
	}
	return nil
}

// checkDistributions accepts only the uniform ternary secret and a discrete
// Gaussian error of the width the security tables assume. A nil
// distribution (left to Lattigo's default) passes.
func checkDistributions(xsd, xed ring.DistributionParameters) error {
	if xsd != nil {
		xs, ok := xsd.(ring.Ternary)
		if !ok {
			return &ErrParams{fmt.Sprintf("params.Xs: a %s secret is not accepted: only the uniform ternary secret (omit Xs)", xsd.Type())}
		}
		if xs.H != 0 {
			return &ErrParams{fmt.Sprintf("params.Xs.H: a sparse secret (Hamming weight %d) is not accepted: only the uniform ternary secret (omit Xs)", xs.H)}
		}
		if want := rlwe.DefaultXs.P; xs.P != want {
			return &ErrParams{fmt.Sprintf("params.Xs.P: density %g is not accepted: only the uniform ternary secret, P = 2/3 (omit Xs)", xs.P)}
		}
	}
	if xed != nil {
		xe, ok := xed.(ring.DiscreteGaussian)
		if !ok {
			return &ErrParams{fmt.Sprintf("params.Xe: a %s error is not accepted: only a discrete Gaussian (omit Xe for sigma 3.2)", xed.Type())}
		}
		if !(xe.Sigma >= MinSigma && xe.Sigma <= MaxSigma) { // also refuses NaN
			return &ErrParams{fmt.Sprintf("params.Xe.Sigma: %g is not accepted: the error's standard deviation must be %g to %d", xe.Sigma, MinSigma, MaxSigma)}
		}
		// 6*3.2 is 19.200000000000003 in floating point: allow for rounding.
		if !(xe.Bound >= MinBoundSigmas*xe.Sigma*(1-1e-9) && xe.Bound <= MaxBoundSigmas*xe.Sigma) {
			return &ErrParams{fmt.Sprintf("params.Xe.Bound: %g is not accepted: the bound must be %d to %d times Sigma", xe.Bound, MinBoundSigmas, MaxBoundSigmas)}
		}
	}
	return nil
}

func resolvePreset(s Scheme, name string) (*Params, error) {
	if s == CKKS {
		if lit, ok := ckksPresets[name]; ok {
			return build(s, name, lit, bgv.ParametersLiteral{})
		}
	} else if lit, ok := bgvPresets[name]; ok {
		return build(s, name, ckks.ParametersLiteral{}, lit)
	}
	return nil, &ErrParams{fmt.Sprintf("unknown %s preset %q (known: %s)", s, clip(name), strings.Join(Presets(s), ", "))}
}

func clip(s string) string {
	if len(s) > 40 {
		return s[:40] + "..."
	}
	return s
}

// build makes the parameters with Lattigo, then checks them. Lattigo panics
// on some malformed literals; the checks before it keep those out.
func build(s Scheme, name string, cl ckks.ParametersLiteral, bl bgv.ParametersLiteral) (p *Params, err error) {
	logN := cl.LogN
	if s == BGV {
		logN = bl.LogN
	}
	// Checked before Lattigo too: it would try to build rings of any size.
	if _, ok := MaxLogQP[logN]; !ok {
		return nil, &ErrParams{fmt.Sprintf("params.LogN: %d is outside 13..16, the ring degrees of the security table", logN)}
	}
	// The literal's own distributions are checked before Lattigo sees them
	// (so the refusal names the field), and again with defaults filled.
	rl := cl.GetRLWEParametersLiteral()
	if s == BGV {
		rl = bl.GetRLWEParametersLiteral()
	}
	if rl.LogNthRoot != 0 && rl.LogNthRoot != logN+1 {
		return nil, &ErrParams{fmt.Sprintf("params.LogNthRoot: only %d (2N) is accepted", logN+1)}
	}
	if err := checkDistributions(rl.Xs, rl.Xe); err != nil {
		return nil, err
	}
	defer func() {
		if r := recover(); r != nil {
			p, err = nil, &ErrParams{fmt.Sprintf("Lattigo refused the parameters: %v", r)}
		}
	}()
	p = &Params{Scheme: s, Name: name}
	var rp rlwe.Parameters
	if s == CKKS {
		if p.CKKS, err = ckks.NewParametersFromLiteral(cl); err != nil {
			return nil, &ErrParams{"invalid CKKS parameters: " + err.Error()}
		}
		rp = p.CKKS.Parameters
		p.JSON, err = p.CKKS.MarshalJSON()
	} else {
		if p.BGV, err = bgv.NewParametersFromLiteral(bl); err != nil {
			return nil, &ErrParams{"invalid BGV parameters: " + err.Error()}
		}
		rp = p.BGV.Parameters
		p.JSON, err = p.BGV.MarshalJSON()
	}
	if err != nil {
		return nil, err
	}
	if err := checkSecurity(rp); err != nil {
		return nil, err
	}
	sum := sha256.Sum256(p.JSON)
	p.ID = "sha256:" + hex.EncodeToString(sum[:])
	return p, nil
}
