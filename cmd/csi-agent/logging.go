package main

import (
	"flag"
	"fmt"

	logsapi "k8s.io/component-base/logs/api/v1"
	_ "k8s.io/component-base/logs/json/register" // the json format

	"github.com/csi-agent/csi-agent/internal/config"
)

// applyLogging switches klog to format, keeping the -v given among
// klogFlags. Text is klog's own output and needs nothing. JSON is
// component-base's, as the Kubernetes components write it: one object a
// line on stderr. It may be applied once per process.
func applyLogging(format string, klogFlags *flag.FlagSet) error {
	if format != config.LogFormatJSON {
		return nil
	}
	c := logsapi.NewLoggingConfiguration()
	c.Format = logsapi.JSONLogFormat
	if v := klogFlags.Lookup("v"); v != nil {
		if err := logsapi.VerbosityLevelPflag(&c.Verbosity).Set(v.Value.String()); err != nil {
			return fmt.Errorf("-v: %w", err)
		}
	}
	if err := logsapi.ValidateAndApply(c, nil); err != nil {
		return fmt.Errorf("logging: %w", err)
	}
	return nil
}
