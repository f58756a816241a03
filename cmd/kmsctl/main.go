// Command kmsctl is the administrator's and worker's command line for kmsd.
package main

import (
	"context"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/kmsd-project/kmsd/api/client"
	"github.com/kmsd-project/kmsd/internal/buildinfo"
)

// Exit codes scripts can rely on.
const (
	exitOK       = 0
	exitInvalid  = 1 // verify: the signature is not valid; audit verify: the log is not intact
	exitUsage    = 2 // bad command line
	exitRefused  = 3 // the server refused the request (4xx)
	exitFailure  = 4 // the server failed (5xx) or could not be reached
	defaultURL   = "https://127.0.0.1:8420"
	helpExitText = `Exit codes: 0 success; 1 verify found the signature invalid, or audit verify
found the log not intact; 2 usage error; 3 the server refused the request (4xx:
bad input, not found, not allowed, wrong state); 4 the server failed (5xx) or
could not be reached.`
)

type env struct {
	ctx    context.Context
	getenv func(string) string
	c      *client.Client
	g      *globals
	stdout io.Writer
	stderr io.Writer
	table  bool // -o table
}

// out prints a command's result as JSON or as a table (-o).
func (e *env) out(v any) error {
	if e.table {
		return printTable(e.stdout, v)
	}
	return printJSON(e.stdout, v)
}

type command struct {
	name     string // "keys create"
	synopsis string // arguments
	help     string
	flags    func(fs *flag.FlagSet) // optional
	nargs    int                    // positional arguments
	optArg   bool                   // and one more may follow (he encrypt NAME, or its older --key NAME)
	run      func(e *env, fs *flag.FlagSet, args []string) (int, error)
}

// globals are the flags every command takes, before or after its name.
type globals struct {
	url, token, tokenFile, caCert, clientCert, clientKey, output string
	timeout                                                      time.Duration
}

func newGlobals(getenv func(string) string) *globals {
	return &globals{
		url: orDefault(getenv("KMS_URL"), defaultURL), token: getenv("KMS_TOKEN"), tokenFile: getenv("KMS_TOKEN_FILE"),
		caCert: orDefault(getenv("KMS_CA_CERT"), getenv("KMS_CACERT")), clientCert: getenv("KMS_CLIENT_CERT"), clientKey: getenv("KMS_CLIENT_KEY"),
		output: getenv("KMS_OUTPUT"), timeout: 60 * time.Second,
	}
}

// define adds the global flags to fs, keeping the values already parsed.
func (g *globals) define(fs *flag.FlagSet) {
	fs.StringVar(&g.url, "url", g.url, "")
	fs.StringVar(&g.url, "addr", g.url, "") // the name before KMS_URL existed
	fs.StringVar(&g.token, "token", g.token, "")
	fs.StringVar(&g.tokenFile, "token-file", g.tokenFile, "")
	fs.DurationVar(&g.timeout, "timeout", g.timeout, "")
	fs.StringVar(&g.caCert, "ca-cert", g.caCert, "")
	fs.StringVar(&g.clientCert, "client-cert", g.clientCert, "")
	fs.StringVar(&g.clientKey, "client-key", g.clientKey, "")
	fs.StringVar(&g.output, "o", g.output, "")
	fs.StringVar(&g.output, "output", g.output, "")
}

func main() {
	os.Exit(run(context.Background(), os.Args[1:], os.Getenv, os.Stdout, os.Stderr))
}

const globalHelp = `Global flags (before or after the command):
  --url URL         kmsd's URL (env KMS_URL, default %s)
  --token TOKEN     bearer token (env KMS_TOKEN)
  --token-file F    file holding the bearer token (env KMS_TOKEN_FILE), e.g. <data-dir>/admin.token
  --ca-cert F       CA certificate (PEM) to trust for https (env KMS_CA_CERT;
                    KMS_CACERT, its older name, still works); for the
                    embedded default: <data-dir>/tls/ca.pem. Empty: system roots
  --client-cert F   client certificate (PEM) for mutual TLS (env KMS_CLIENT_CERT)
  --client-key F    its private key (env KMS_CLIENT_KEY)
  -o, --output F    json or table (env KMS_OUTPUT; default: table on a terminal,
                    json otherwise)
  --timeout D       request timeout (env KMS_TIMEOUT, default 60s; background
                    operations are waited for without it)
`

func usage(w io.Writer) {
	fmt.Fprintf(w, "kmsctl: command line for kmsd, the post-quantum key management service.\n\nUsage: kmsctl <command> [arguments] [flags]\n\n"+globalHelp+"\nCommands:\n", defaultURL)
	for _, c := range commands {
		fmt.Fprintf(w, "  %s\n      %s\n", strings.TrimSpace(c.name+" "+c.synopsis), c.help)
	}
	fmt.Fprintf(w, "\nRun 'kmsctl <command> --help' (or 'kmsctl help <command>') for a command's\nflags, 'kmsctl <group> --help' for a group's commands. Binary values on the\ncommand line are standard base64.\n\n%s\n", helpExitText)
}

// groupUsage lists the commands of one group (keys, versions, ...).
func groupUsage(w io.Writer, group string) {
	fmt.Fprintf(w, "Usage: kmsctl %s <command> [arguments] [flags]\n\nCommands:\n", group)
	for _, c := range commands {
		if strings.HasPrefix(c.name, group+" ") {
			fmt.Fprintf(w, "  %s\n      %s\n", strings.TrimSpace(c.name+" "+c.synopsis), c.help)
		}
	}
	fmt.Fprintf(w, "\nRun 'kmsctl %s <command> --help' for a command's flags, 'kmsctl --help' for\nthe global flags.\n", group)
}

func commandUsage(w io.Writer, cmd *command) {
	fmt.Fprintf(w, "Usage: kmsctl %s\n  %s\n", strings.TrimSpace(cmd.name+" "+cmd.synopsis), cmd.help)
	if cmd.flags != nil {
		own := flag.NewFlagSet(cmd.name, flag.ContinueOnError)
		cmd.flags(own)
		fmt.Fprintln(w, "\nFlags:")
		printFlags(w, own)
	}
	fmt.Fprintf(w, "\n"+globalHelp, defaultURL)
}

// printFlags lists a command's flags as the global help does: "--name
// VALUE", its help, and its default when it has one.
func printFlags(w io.Writer, fs *flag.FlagSet) {
	fs.VisitAll(func(f *flag.Flag) {
		name, usage := flag.UnquoteUsage(f)
		line := "  --" + f.Name
		if name != "" {
			line += " " + strings.ToUpper(name)
		}
		fmt.Fprintf(w, "%s\n      %s", line, usage)
		if f.DefValue != "" && f.DefValue != "false" && f.DefValue != "0" {
			fmt.Fprintf(w, " (default %s)", f.DefValue)
		}
		fmt.Fprintln(w)
	})
}

// isGroup says whether word is the first word of some command.
func isGroup(word string) bool {
	for _, c := range commands {
		if strings.HasPrefix(c.name, word+" ") {
			return true
		}
	}
	return false
}

func isHelp(a string) bool { return a == "-h" || a == "-help" || a == "--help" }

// didYouMean is ` (did you mean "kmsctl X"?)` for the command closest to
// words, "" if none is close.
func didYouMean(words []string) string {
	if s := suggest(words); s != "" {
		return fmt.Sprintf(" (did you mean \"kmsctl %s\"?)", s)
	}
	return ""
}

func run(ctx context.Context, args []string, getenv func(string) string, stdout, stderr io.Writer) int {
	g := newGlobals(getenv)
	if v := getenv("KMS_TIMEOUT"); v != "" {
		d, err := time.ParseDuration(v)
		if err != nil || d <= 0 {
			fmt.Fprintf(stderr, "kmsctl: KMS_TIMEOUT=%q: want a duration such as 30s or 2m\n", v)
			return exitUsage
		}
		g.timeout = d
	}
	gfs := flag.NewFlagSet("kmsctl", flag.ContinueOnError)
	gfs.SetOutput(io.Discard)
	g.define(gfs)
	if err := gfs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			usage(stdout)
			return exitOK
		}
		fmt.Fprintf(stderr, "kmsctl: %v\n\n", err)
		usage(stderr)
		return exitUsage
	}
	rest := gfs.Args()
	help := false
	if len(rest) > 0 && rest[0] == "help" {
		help, rest = true, rest[1:]
	}
	if len(rest) == 0 {
		usage(stdout)
		if help {
			return exitOK
		}
		return exitUsage
	}
	cmd, rest := findCommand(rest)
	if cmd == nil {
		words := gfs.Args()
		if help {
			words = words[1:]
		}
		if isGroup(words[0]) {
			if help || len(words) == 1 || isHelp(words[1]) {
				if help || len(words) > 1 {
					groupUsage(stdout, words[0])
					return exitOK
				}
				groupUsage(stderr, words[0])
				return exitUsage
			}
			fmt.Fprintf(stderr, "kmsctl: unknown command %q%s\n\n", words[0]+" "+words[1], didYouMean(words))
			groupUsage(stderr, words[0])
			return exitUsage
		}
		fmt.Fprintf(stderr, "kmsctl: unknown command %q%s; run 'kmsctl --help' for the list\n", words[0], didYouMean(words))
		return exitUsage
	}
	if help {
		commandUsage(stdout, cmd)
		return exitOK
	}
	fs := flag.NewFlagSet("kmsctl "+cmd.name, flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	g.define(fs)
	if cmd.flags != nil {
		cmd.flags(fs)
	}
	pos, err := parseInterleaved(fs, rest)
	if errors.Is(err, flag.ErrHelp) {
		commandUsage(stdout, cmd)
		return exitOK
	}
	if err == nil && len(pos) != cmd.nargs && !(cmd.optArg && len(pos) == cmd.nargs+1) {
		err = fmt.Errorf("%s takes %d argument(s): %s", cmd.name, cmd.nargs, cmd.synopsis)
	}
	if err != nil {
		fmt.Fprintf(stderr, "kmsctl: %v\nRun 'kmsctl %s --help' for its flags.\n", err, cmd.name)
		return exitUsage
	}
	if getenv("KMS_URL") == "" && getenv("KMS_ADDR") != "" && !isSet(gfs, "url") && !isSet(gfs, "addr") && !isSet(fs, "url") && !isSet(fs, "addr") {
		fmt.Fprintf(stderr, "kmsctl: note: KMS_ADDR is kmsd's listen address and kmsctl does not read it; set KMS_URL (for example %s)\n", urlFromAddr(getenv("KMS_ADDR")))
	}
	table, err := outputMode(g.output, stdout)
	if err != nil {
		fmt.Fprintf(stderr, "kmsctl: %v\n", err)
		return exitUsage
	}
	if cmd.name == "version" { // needs no server, token or CA
		fmt.Fprintln(stdout, buildinfo.String("kmsctl"))
		return exitOK
	}
	if cmd.name == "completion" { // the same
		if err := writeCompletion(stdout, pos[0]); err != nil {
			fmt.Fprintf(stderr, "kmsctl: %v\n", err)
			return exitUsage
		}
		return exitOK
	}
	tok := g.token
	if tok == "" && g.tokenFile != "" {
		b, err := os.ReadFile(g.tokenFile)
		if err != nil {
			fmt.Fprintf(stderr, "kmsctl: token file: %v\n", err)
			return exitUsage
		}
		tok = strings.TrimSpace(string(b))
	}
	tlsCfg, err := client.TLSConfig(g.caCert, g.clientCert, g.clientKey)
	if err != nil {
		fmt.Fprintf(stderr, "kmsctl: %v\n", err)
		return exitUsage
	}
	c, err := client.New(g.url, tok, client.WithTLS(tlsCfg))
	if err != nil {
		fmt.Fprintf(stderr, "kmsctl: --url: %v\n", err)
		return exitUsage
	}
	g.token = tok
	ctx, cancel := context.WithTimeout(ctx, g.timeout)
	defer cancel()
	code, err := cmd.run(&env{ctx: ctx, getenv: getenv, c: c, g: g, stdout: stdout, stderr: stderr, table: table}, fs, pos)
	if err != nil {
		var ue usageError
		switch {
		case errors.As(err, &ue):
			fmt.Fprintf(stderr, "kmsctl: %v\n", err)
			return exitUsage
		case client.StatusOf(err) >= 400 && client.StatusOf(err) < 500:
			fmt.Fprintf(stderr, "kmsctl: %v\n", err)
			if h := hint(err, g); h != "" {
				fmt.Fprintf(stderr, "kmsctl: %s\n", h)
			}
			return exitRefused
		default:
			fmt.Fprintf(stderr, "kmsctl: %v\n", err)
			if h := hint(err, g); h != "" {
				fmt.Fprintf(stderr, "kmsctl: %s\n", h)
			}
			return exitFailure
		}
	}
	return code
}

// urlFromAddr is the URL for kmsd's listen address addr, which a user may
// have written as a URL already.
func urlFromAddr(addr string) string {
	if strings.HasPrefix(addr, "https://") || strings.HasPrefix(addr, "http://") {
		return addr
	}
	return "https://" + addr
}

// hint says which flag or variable fixes the commonest failures of a first
// run: an untrusted CA, plain HTTP against kmsd's HTTPS (and the
// reverse), no token.
func hint(err error, g *globals) string {
	var unknownCA x509.UnknownAuthorityError
	var certInvalid x509.CertificateInvalidError
	var hostname x509.HostnameError
	switch {
	case errors.As(err, &unknownCA), errors.As(err, &certInvalid):
		return "kmsd's certificate does not chain to a CA kmsctl trusts: give the CA with --ca-cert FILE or KMS_CA_CERT (kmsd's own CA, for its embedded default, is <data-dir>/tls/ca.pem)"
	case errors.As(err, &hostname):
		return "kmsd's certificate is not for the host in --url/KMS_URL: use a name it was made for (the embedded default's: localhost, 127.0.0.1, ::1)"
	case strings.Contains(err.Error(), "server gave HTTP response to HTTPS client"):
		return "kmsd at --url/KMS_URL answers plain HTTP (it runs with --insecure-http): use http:// in --url/KMS_URL"
	case client.StatusOf(err) == 400 && strings.HasPrefix(g.url, "http://") && !isProblemDocument(err):
		return "kmsd listens for HTTPS: use https:// in --url/KMS_URL (and --ca-cert or KMS_CA_CERT for its CA)"
	case client.StatusOf(err) == 401 && g.token == "":
		return "no token was given: use --token, KMS_TOKEN, --token-file or KMS_TOKEN_FILE (an admin's is in <data-dir>/admin.token)"
	}
	return ""
}

// isProblemDocument says whether err came with one of kmsd's problem
// documents (not, say, Go's plain-text 400 to plain HTTP on a TLS port).
func isProblemDocument(err error) bool {
	var e *client.Error
	return errors.As(err, &e) && e.Type != ""
}

// outputMode resolves -o: table by default on a terminal, JSON otherwise.
func outputMode(o string, stdout io.Writer) (bool, error) {
	switch o {
	case "json":
		return false, nil
	case "table":
		return true, nil
	case "":
		f, ok := stdout.(*os.File)
		if !ok {
			return false, nil
		}
		fi, err := f.Stat()
		return err == nil && fi.Mode()&os.ModeCharDevice != 0, nil
	}
	return false, fmt.Errorf("-o %q: give json or table", o)
}

type usageError struct{ msg string }

func (u usageError) Error() string { return u.msg }

func orDefault(v, d string) string {
	if v == "" {
		return d
	}
	return v
}

// findCommand matches the longest command name at the start of args.
func findCommand(args []string) (*command, []string) {
	for n := 2; n >= 1; n-- {
		if len(args) < n {
			continue
		}
		name := strings.Join(args[:n], " ")
		for i := range commands {
			if commands[i].name == name {
				return &commands[i], args[n:]
			}
		}
	}
	return nil, nil
}

// parseInterleaved lets flags come before, between or after positional
// arguments.
func parseInterleaved(fs *flag.FlagSet, args []string) ([]string, error) {
	var pos []string
	for {
		if err := fs.Parse(args); err != nil {
			return nil, err
		}
		if fs.NArg() == 0 {
			return pos, nil
		}
		pos = append(pos, fs.Arg(0))
		args = fs.Args()[1:]
	}
}

func printJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

func parseVersion(s string, allowPrimary bool) (uint64, error) {
	if allowPrimary && s == "primary" {
		return 0, nil
	}
	n, err := strconv.ParseUint(s, 10, 32)
	if err != nil || n == 0 {
		if allowPrimary {
			return 0, usageError{fmt.Sprintf("version %q must be a positive number or \"primary\"", s)}
		}
		return 0, usageError{fmt.Sprintf("version %q must be a positive number", s)}
	}
	return n, nil
}

// binaryInput reads a value given as base64 text, or raw from a file (- for
// stdin).
func binaryInput(b64, file, what string) ([]byte, error) {
	switch {
	case b64 != "" && file != "":
		return nil, usageError{fmt.Sprintf("give --%s or --%s-file, not both", what, what)}
	case file == "-":
		return io.ReadAll(os.Stdin)
	case file != "":
		b, err := os.ReadFile(file)
		if err != nil {
			return nil, usageError{fmt.Sprintf("--%s-file: %v", what, err)}
		}
		return b, nil
	case b64 != "":
		b, err := base64.StdEncoding.DecodeString(b64)
		if err != nil {
			return nil, usageError{fmt.Sprintf("--%s is not standard base64", what)}
		}
		return b, nil
	}
	return nil, nil
}

func splitList(s string) []string {
	if s == "" {
		return nil
	}
	var out []string
	for _, p := range strings.Split(s, ",") {
		if p = strings.TrimSpace(p); p != "" {
			out = append(out, p)
		}
	}
	return out
}
