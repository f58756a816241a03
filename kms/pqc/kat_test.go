package pqc

import (
	"compress/gzip"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"flag"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

var updateKAT = flag.Bool("update-kat", false, "rewrite kat.json from circl's ACVP testdata")

// circlDir finds circl's source in the module cache (go test has it there).
func circlDir(t *testing.T) string {
	out, err := exec.Command("go", "list", "-m", "-f", "{{.Dir}}", "github.com/cloudflare/circl").Output()
	if err != nil {
		t.Fatalf("go list circl: %v", err)
	}
	return strings.TrimSpace(string(out))
}

func readACVP(t *testing.T, dir string) (groups []map[string]any, results map[float64]map[string]any) {
	read := func(name string) []map[string]any {
		f, err := os.Open(filepath.Join(dir, name))
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		zr, err := gzip.NewReader(f)
		if err != nil {
			t.Fatal(err)
		}
		var doc struct {
			TestGroups []map[string]any `json:"testGroups"`
		}
		if err := json.NewDecoder(zr).Decode(&doc); err != nil {
			t.Fatal(err)
		}
		return doc.TestGroups
	}
	groups = read("prompt.json.gz")
	results = map[float64]map[string]any{}
	for _, g := range read("expectedResults.json.gz") {
		for _, tc := range g["tests"].([]any) {
			m := tc.(map[string]any)
			results[m["tcId"].(float64)] = m
		}
	}
	return groups, results
}

func digestHex(t *testing.T, h string) string {
	b, err := hex.DecodeString(h)
	if err != nil {
		t.Fatal(err)
	}
	d := sha256.Sum256(b)
	return hex.EncodeToString(d[:])
}

// buildKAT derives kat.json's content from circl's ACVP files: the first AFT
// vector of each parameter set.
func buildKAT(t *testing.T) katFile {
	root := circlDir(t)
	f := katFile{Source: "NIST ACVP vectors shipped in github.com/cloudflare/circl testdata (ML-KEM-keyGen-FIPS203, ML-KEM-encapDecap-FIPS203, ML-DSA-keyGen-FIPS204)"}
	seen := map[string]bool{}
	for _, dir := range []string{"kem/mlkem/testdata/ML-KEM-keyGen-FIPS203", "sign/mldsa/testdata/ML-DSA-keyGen-FIPS204"} {
		groups, results := readACVP(t, filepath.Join(root, dir))
		for _, g := range groups {
			ps := g["parameterSet"].(string)
			if g["testType"] != "AFT" || seen["kg"+ps] {
				continue
			}
			seen["kg"+ps] = true
			tc := g["tests"].([]any)[0].(map[string]any)
			id := tc["tcId"].(float64)
			v := katKeyGen{ParameterSet: ps, TcID: int(id)}
			if strings.HasPrefix(ps, "ML-KEM") {
				v.Seed = strings.ToLower(tc["d"].(string) + tc["z"].(string))
				v.PublicSHA256 = digestHex(t, results[id]["ek"].(string))
			} else {
				v.Seed = strings.ToLower(tc["seed"].(string))
				v.PublicSHA256 = digestHex(t, results[id]["pk"].(string))
			}
			f.KeyGen = append(f.KeyGen, v)
		}
	}
	groups, results := readACVP(t, filepath.Join(root, "kem/mlkem/testdata/ML-KEM-encapDecap-FIPS203"))
	for _, g := range groups {
		ps := g["parameterSet"].(string)
		if g["testType"] != "AFT" || seen["enc"+ps] {
			continue
		}
		seen["enc"+ps] = true
		tc := g["tests"].([]any)[0].(map[string]any)
		id := tc["tcId"].(float64)
		f.Encap = append(f.Encap, katEncap{
			ParameterSet: ps, TcID: int(id),
			EK: strings.ToLower(tc["ek"].(string)), M: strings.ToLower(tc["m"].(string)),
			CSHA256: digestHex(t, results[id]["c"].(string)), K: strings.ToLower(results[id]["k"].(string)),
		})
	}
	return f
}

// TestKATFromACVP checks that the embedded vectors are exactly the ones in
// circl's copy of the NIST files, so they cannot drift or be edited by hand.
func TestKATFromACVP(t *testing.T) {
	want := buildKAT(t)
	buf, err := json.MarshalIndent(want, "", "  ")
	if err != nil {
		t.Fatal(err)
	}
	buf = append(buf, '\n')
	if *updateKAT {
		if err := os.WriteFile("kat.json", buf, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if string(buf) != string(katJSON) {
		t.Fatal("kat.json differs from circl's ACVP testdata; run go test ./kms/pqc -run TestKATFromACVP -update-kat")
	}
	if len(want.KeyGen) != 6 || len(want.Encap) != 3 {
		t.Fatalf("want 6 keyGen and 3 encapsulation vectors, got %d and %d", len(want.KeyGen), len(want.Encap))
	}
}
