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
	"math"
	"reflect"
	"slices"
	"strings"

	"github.com/tuneinsight/lattigo/v6/core/rlwe"
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
// 128-bit classical security with a ternary secret, by log2(N). Lattigo does
// not check it; Resolve does, for presets and custom literals alike.
var MaxLogQP = map[int]float64{13: 218, 14: 438, 15: 881, 16: 1772}

// Params is a checked parameter set.
type Params struct {
	Scheme Scheme
	Name   string // preset name, or "custom"
	CKKS   ckks.Parameters
	BGV    bgv.Parameters
	// ID is "sha256:" of the canonical JSON (Lattigo's MarshalJSON of the
	// resolved parameters, moduli included).
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
var ckksPresets = map[string]ckks.ParametersLiteral{
	"ckks-logn13": {LogN: 13, LogQ: []int{45, 35, 35, 35}, LogP: []int{45}, LogDefaultScale: 35},
	"ckks-logn14": {LogN: 14, LogQ: append([]int{55}, repeat(40, 7)...), LogP: []int{55, 45}, LogDefaultScale: 40},
	"ckks-logn15": {LogN: 15, LogQ: append([]int{60}, repeat(45, 14)...), LogP: []int{61, 61, 61}, LogDefaultScale: 45},
	"ckks-logn16": {LogN: 16, LogQ: append([]int{60}, repeat(50, 26)...), LogP: repeat(61, 6), LogDefaultScale: 50},
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

// Resolve turns a preset name or a Lattigo ParametersLiteral (JSON) into
// checked parameters.
func Resolve(s Scheme, spec json.RawMessage) (*Params, error) {
	var name string
	if err := json.Unmarshal(spec, &name); err == nil {
		return resolvePreset(s, name)
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
	bound, ok := MaxLogQP[logN]
	if !ok {
		return nil, &ErrParams{fmt.Sprintf("LogN %d is outside 13..16", logN)}
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
	if lqp := rp.LogQP(); lqp > bound || math.IsNaN(lqp) {
		return nil, &ErrParams{fmt.Sprintf("log2(QP) = %.1f exceeds %.0f, the 128-bit security bound for N = 2^%d with a ternary secret", lqp, bound, logN)}
	}
	if rp.Xs().Type() != "Ternary" {
		return nil, &ErrParams{"the secret distribution must be ternary (the security bound assumes it)"}
	}
	sum := sha256.Sum256(p.JSON)
	p.ID = "sha256:" + hex.EncodeToString(sum[:])
	return p, nil
}
